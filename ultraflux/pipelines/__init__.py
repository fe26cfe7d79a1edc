from ultraflux.pipelines.pipeline_ultraflux import UltraFluxPipeline, load_pipeline

__all__ = ["UltraFluxPipeline", "load_pipeline"]
