"""Entry point of the standalone cilia-cni (PyInstaller runs this file as __main__)."""

from cilia.cni.main import main

if __name__ == "__main__":
    main()
