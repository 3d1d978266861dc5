"""Data wrangling with foundation models (Narayan et al., VLDB 2022) as a FlexGen batch app:
`python3 -m flexgen.apps.data_wrangle --help`; `... data_wrangle prepare --help` for the data."""
