from toolchain.app.cli import main

main()
