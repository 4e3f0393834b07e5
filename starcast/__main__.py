try:
    from starcast.cli import main
except KeyboardInterrupt:  # Ctrl-C while Python loads the entry point: as quiet as any other interrupt
    import sys

    sys.stderr.write("starcast: interrupted\n")
    sys.exit(130)

main()
