"""rao-tune: Reward Alignment Optimization and its sibling preference losses as torchtune recipes."""

__version__ = "0.1.0"
