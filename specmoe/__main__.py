from specmoe.cli import main

main()
