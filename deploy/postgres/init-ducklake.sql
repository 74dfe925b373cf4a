-- Runs once, when the postgres container initialises an empty data directory: the DuckLake
-- catalog gets its own database beside Dagster's (same server, same owner).
CREATE DATABASE ducklake;
