import sys

from aivo_mesh.cli import main

sys.exit(main())
