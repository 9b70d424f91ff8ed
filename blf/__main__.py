from blf.entry import main

main()
