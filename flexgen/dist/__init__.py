"""Pipeline parallelism with offloading over torch.distributed (see README, "Several GPUs and
machines"): stages.py cuts the layers into stages, comm.py moves tensors between ranks and ends
every rank cleanly when one fails, pipeline.py runs the micro-batch loop, cli.py is
`python3 -m flexgen.dist_flex_opt` / `flexgen.dist_flex_llama`."""
