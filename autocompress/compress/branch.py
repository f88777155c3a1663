"""Placeholder until the primitive lands: offers no decisions."""

from autocompress.compress.base import Primitive


class BranchMerge(Primitive):
    kinds = ("branch",)

    def decisions(self, graph):
        return []

    def estimate(self, table, chosen, space):
        return None

    def transform(self, model, chosen, ctx):
        return model
