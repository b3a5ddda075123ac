"""The one compiled part: pipelines/data/_crop_decode.c, a partial JPEG decode against the system
libjpeg-turbo (Debian libjpeg62-turbo-dev: `make setup` installs it). Everything else is in
pyproject.toml. optional=True: without the headers the install still succeeds and
pipelines.data.crop_decode falls back to the full decode, counting every image it does."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("pipelines.data._crop_decode", ["pipelines/data/_crop_decode.c"],
                             libraries=["jpeg"], optional=True)])
