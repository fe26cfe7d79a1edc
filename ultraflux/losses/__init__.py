"""DiT objectives (seed Sec. 4, Table 3 "DiT objective"): Haar DWT and the SNR-aware Huber wavelet loss."""
from ultraflux.losses.dit import (OBJECTIVES, dit_loss, flow_snr, huber_c, min_snr_weight, pseudo_huber,
                                  velocity_target, wavelet_bands)
from ultraflux.losses.wavelet import SUBBANDS, haar_dwt2, haar_idwt2

__all__ = ["OBJECTIVES", "SUBBANDS", "dit_loss", "flow_snr", "haar_dwt2", "haar_idwt2", "huber_c", "min_snr_weight",
           "pseudo_huber", "velocity_target", "wavelet_bands"]
