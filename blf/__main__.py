from blf.cli import main

main()
