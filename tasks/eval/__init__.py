"""Eval stage: every configured model answers the eval split; accuracy per reasoning category."""
