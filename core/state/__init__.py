"""The core's state in its database (peewee): models, and the functions that read and write rows.

Everything here is synchronous and runs in the database thread (core.state.db.Database.run).
"""
