from flexmoe_lab.cli import main

main()
