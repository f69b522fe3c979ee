from qlp_compress.cli.main import main

main()
