from qlp_compress.cli.commands import main

main()
