from starcast.cli import main

main()
