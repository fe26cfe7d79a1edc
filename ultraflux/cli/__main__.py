import sys

from ultraflux.cli import main

sys.exit(main())
