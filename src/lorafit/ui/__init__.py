"""`lorafit ui`: the local web app (lorafit.ui.app)."""
