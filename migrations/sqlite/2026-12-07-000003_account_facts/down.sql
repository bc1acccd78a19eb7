DROP TABLE account_facts;
