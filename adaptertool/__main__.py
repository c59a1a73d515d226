from adaptertool.cli import main

main()
