"""The 2x2 data-model co-design ablation (seed Table 1) as four DVC experiments, run and summarised by one command
(``ultraflux ablation``, ultraflux/cli/ablation.py).

  A  baseline      Diffusion-4K recipe (data.variant=baseline)    + Flux, latent L2 (objective=l2, rope.kind=flux)
  B  data only     MultiAspect recipe  (data.variant=multiaspect) + Flux, latent L2
  C  model only    Diffusion-4K recipe                            + UltraFlux (objective=ultraflux,
                                                                               rope.kind=resonance_yarn)
  D  co-design     MultiAspect recipe                             + UltraFlux

One module per concern; the cell definitions live below in ``ultraflux.codesign`` so that ``tracking`` can tag runs
without importing the driver:

* (``ultraflux.codesign``, below this package: the grid, its MLflow tags, the paper's numbers, seed Table 1)
* ``dvc_queue``   driving DVC: queue the cells, run the workers, wait, read results back (``dvc exp show``, logs,
                  the manifest through ``dvc.api``)
* ``table``       the Table-1 summary (rows, non-additivity, CSV / Markdown / PNG, validation-loss curves)
* ``mlflow_log``  completing each cell's parent run and the summary run in MLflow
* ``run``         ``run_ablation``: the steps in order
"""
