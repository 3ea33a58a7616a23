from tailwise_cli import main

main()
