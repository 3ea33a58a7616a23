from steps.cli import main

main()
