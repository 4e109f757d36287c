"""``layerhessians datasets``: list the datasets and where they live, or download some."""


HELP = "List the datasets (folder, present?, classes, image shape) or download some with checksums."


def add_arguments(parser) -> None:
    """Add the ``datasets`` subcommand's options to ``parser`` (an ``argparse`` parser)."""
    # the registry (and torch, through the data package) only when this command is chosen
    from layerhessians.data import DATASETS

    parser.add_argument("--root", default="datasets",
                        help="folder holding one sub-folder per dataset (default: %(default)s)")
    parser.add_argument("--download", nargs="+", metavar="NAME", default=[],
                        help=f"download these datasets (one or more of {', '.join(DATASETS)}; "
                             "or 'all') and verify their MD5 checksums")


def run(args) -> int:
    """List the datasets under ``args.root`` after downloading those of ``args.download``.

    Args:
        args: the parsed options of :func:`add_arguments`.

    Returns:
        The exit status, 0.

    Raises:
        UserError: an unknown dataset name, or a download that fails or fails its MD5 check
            (:class:`~layerhessians.errors.DatasetMissingError`).
    """
    from layerhessians.data import DATASETS, dataset_table, download_dataset, get_spec

    names = list(DATASETS) if [n.lower() for n in args.download] == ["all"] else args.download
    for spec in [get_spec(name) for name in names]:  # every name checked before downloading
        print(download_dataset(spec, args.root), flush=True)
    table = dataset_table(args.root)[["name", "folder", "present", "classes", "image_shape", "flip"]]
    print(table.to_string(index=False))
    return 0
