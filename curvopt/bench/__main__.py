import sys

from curvopt.bench.cli import main

sys.exit(main())
