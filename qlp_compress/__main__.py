from qlp_compress.cli import main

main()
