"""auditlens: does this field photo show the product in the catalogue?"""

__version__ = "0.1.0"
