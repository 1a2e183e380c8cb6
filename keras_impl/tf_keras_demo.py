"""The Keras demo worker on tf_keras: ``python -m keras_impl.tf_keras_demo`` (flags: see keras_impl.demo)."""

from __future__ import annotations

import sys

from keras_impl.demo import main

if __name__ == "__main__":
    sys.exit(main(framework="tf_keras"))
