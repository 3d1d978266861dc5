"""OPT over a pipeline of ranks: `torchrun --nproc-per-node N -m flexgen.dist_flex_opt [flex_opt's flags]`,
or the original FlexGen's launch (`mpirun ... -m flexgen.dist_flex_opt --head-ip IP --port P --use-mpi`,
or each rank by hand with --head-ip --port --rank --local-rank --world-size). See flexgen/dist/."""
from .dist.cli import main as _main
from .flex_opt import OptLM


def main(argv=None):
    _main(OptLM, "facebook/opt-6.7b", "~/opt_weights", "dist-fo", argv)


if __name__ == "__main__":
    main()
