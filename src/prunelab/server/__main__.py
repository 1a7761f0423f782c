from prunelab.server.launch import main

if __name__ == "__main__":  # `python -m prunelab.server`; importing this module runs nothing
    raise SystemExit(main())
