"""Shedder Studio: ``streamlit run app/main.py``.

The entry script only sets up navigation; each page lives in the top-level ``pages/`` folder and
is registered explicitly with ``st.navigation`` (so the folder need not sit next to this file).
"""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run app/main.py` puts only app/ on the path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import nav  # noqa: E402

st.set_page_config(page_title="Shedder Studio", page_icon=":material/content_cut:", layout="wide")
page = st.navigation(nav.pages())
st.sidebar.caption("Shedder Studio — training-free structured pruning of Mamba-family models "
                   "(Mamba-Shedder, NAACL 2025). Every number is computed by the `shedder` engine.")
page.run()
