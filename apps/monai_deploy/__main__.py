"""Entry point of the application folder: ``python apps/monai_deploy -i DICOM_DIR -o OUT -m model.ts``, and how the
packaged application (MAP) starts it."""

import logging

from app import FlareCascadeApp

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    FlareCascadeApp().run()
