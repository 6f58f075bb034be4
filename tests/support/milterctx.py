"""Milter.testctx.TestCtx as libmilter reads a callback's NOREPLY.

pymilter's test context offers every protocol option, so a ``@Milter.noreply`` callback
(the adapter's ``header``) answers NOREPLY, which TestCtx takes for a refusal and stops.
libmilter takes it for "continue, send nothing" (Postfix was told not to wait for a
reply); so does this subclass. Nothing else changes.
"""

from __future__ import annotations

import Milter
from Milter.testctx import TestCtx


class MilterCtx(TestCtx):
    def _header(self, fld, val):
        rc = super()._header(fld, val)
        return Milter.CONTINUE if rc == Milter.NOREPLY else rc
