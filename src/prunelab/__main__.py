from prunelab.cli import main

if __name__ == "__main__":  # `python -m prunelab`; importing this module runs nothing
    raise SystemExit(main())
