#!/usr/bin/env bash
# Creates one role and database per service on the first start of an empty data volume
# (the postgres image runs /docker-entrypoint-initdb.d/* only then). Later password changes
# go through `ALTER ROLE ... PASSWORD` by hand; editing infra/.env alone does not change them.
#
# Passwords arrive as psql variables and are quoted by psql (:'var'), never pasted into SQL.
set -e

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
    -v prefect_password="$PREFECT_DB_PASSWORD" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_password';
CREATE DATABASE prefect OWNER prefect;

CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
-- the basic-auth app's users and permissions, apart from the tracking data
CREATE DATABASE mlflow_auth OWNER mlflow;
SQL
