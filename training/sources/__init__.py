"""One module per public data set, each reading the set's own layout from a folder.

Every builder yields ``Instruction``s and takes what varies from the caller: the folder, the
split, a ``random.Random`` for template choice, and ``size``, the function that gives an
image's width and height (by default read from the image file's header).
"""
