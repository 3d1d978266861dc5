"""The original FlexGen's entry point name (flexgen/apps/data_wrangle/data_wrangle_run.py): its
scripts' command lines run unchanged as `python3 -m flexgen.apps.data_wrangle.data_wrangle_run ...`."""
from .app import main

if __name__ == "__main__":
    main()
