import sys

from pyfed.cli import main

sys.exit(main())
