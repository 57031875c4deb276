import sys

from fastinfer.entrypoints.cli import main

sys.exit(main())
