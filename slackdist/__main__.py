import sys

from slackdist.cli import main

sys.exit(main())
