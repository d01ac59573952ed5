from dsched.cli import main

main()
