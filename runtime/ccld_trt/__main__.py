from ccld_trt.cli import main

main()
