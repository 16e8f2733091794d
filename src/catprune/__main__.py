import sys

from catprune.cli.main import main

sys.exit(main())
