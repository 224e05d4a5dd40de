from phibroker.cli import main

main()
