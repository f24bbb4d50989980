"""``python -m flexmoe``."""

from flexmoe.cli import main

main()
