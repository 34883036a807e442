from protego.cli import main

main()
