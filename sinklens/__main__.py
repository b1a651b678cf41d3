import sys

from sinklens.present.cli import main

sys.exit(main())
