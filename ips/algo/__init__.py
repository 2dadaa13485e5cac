"""The IPS algorithm without learning: exact streaming top-M selection (`selection`)."""
