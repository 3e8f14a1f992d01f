"""Stand-in for a dataset whose pipeline is on the roadmap but not in the zoo yet.

Experiments that name it build, print and dry-run at full size; training fails at once with a
message saying what is missing and what to run instead.
"""


class Planned:

  def __init__(self, what: str, roadmap_item: int, data_dir: str | None = None, **_):
    raise FileNotFoundError(
        f'{what} is not available yet: its input pipeline is ROADMAP item {roadmap_item}. '
        f'Use the experiment\'s _Synthetic twin or an embedded dataset (--exp=list).')
