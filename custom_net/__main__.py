import sys

from custom_net.train import cli

sys.exit(cli())
