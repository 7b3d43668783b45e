/* The chat templates moe-gen-model writes into tokenizer_config.json, one per architecture: the
 * real templates of each family's instruct checkpoint, kept byte-identical to
 * tests/reference/chat_templates/ARCH.jinja (sources in its README; chat_template_test.py checks
 * that a generated model carries exactly that text). Generated from those files. */
#include <stdlib.h>
#include <string.h>

#include "tools/moe_gen_model/gen_model.h"

static const char *const MIXTRAL[] = {
    "{%- if messages[0]['role'] == 'system' %}\n",
    "    {%- set system_message = messages[0]['content'] %}\n",
    "    {%- set loop_messages = messages[1:] %}\n",
    "{%- else %}\n",
    "    {%- set loop_messages = messages %}\n",
    "{%- endif %}\n",
    "\n",
    "{{- bos_token }}\n",
    "{%- for message in loop_messages %}\n",
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n",
    "        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}\n",
    "    {%- endif %}\n",
    "    {%- if message['role'] == 'user' %}\n",
    "        {%- if loop.first and system_message is defined %}\n",
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n",
    "        {%- else %}\n",
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n",
    "        {%- endif %}\n",
    "    {%- elif message['role'] == 'assistant' %}\n",
    "        {{- ' ' + message['content'] + eos_token}}\n",
    "    {%- else %}\n",
    "        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}\n",
    "    {%- endif %}\n",
    "{%- endfor %}\n",
    NULL};

static const char *const QWEN2_MOE[] = {
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    NULL};

static const char *const OLMOE[] = {
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '\\n' }}{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\\n'  + message['content'] + eos_token + '\\n' }}{% else %}{{ '<|assistant|>\\n'  + message['content'] + eos_token }}{% endif %}{% endif %}{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}{% endfor %}",
    NULL};

static const char *const QWEN3_MOE[] = {
    "{%- if tools %}\n",
    "    {{- '<|im_start|>system\\n' }}\n",
    "    {%- if messages[0].role == 'system' %}\n",
    "        {{- messages[0].content + '\\n\\n' }}\n",
    "    {%- endif %}\n",
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n",
    "    {%- for tool in tools %}\n",
    "        {{- \"\\n\" }}\n",
    "        {{- tool | tojson }}\n",
    "    {%- endfor %}\n",
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n",
    "{%- else %}\n",
    "    {%- if messages[0].role == 'system' %}\n",
    "        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}\n",
    "    {%- endif %}\n",
    "{%- endif %}\n",
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}\n",
    "{%- for message in messages[::-1] %}\n",
    "    {%- set index = (messages|length - 1) - loop.index0 %}\n",
    "    {%- if ns.multi_step_tool and message.role == \"user\" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}\n",
    "        {%- set ns.multi_step_tool = false %}\n",
    "        {%- set ns.last_query_index = index %}\n",
    "    {%- endif %}\n",
    "{%- endfor %}\n",
    "{%- for message in messages %}\n",
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) %}\n",
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n",
    "    {%- elif message.role == \"assistant\" %}\n",
    "        {%- set content = message.content %}\n",
    "        {%- set reasoning_content = '' %}\n",
    "        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}\n",
    "            {%- set reasoning_content = message.reasoning_content %}\n",
    "        {%- else %}\n",
    "            {%- if '</think>' in message.content %}\n",
    "                {%- set content = message.content.split('</think>')[-1].lstrip('\\n') %}\n",
    "                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}\n",
    "            {%- endif %}\n",
    "        {%- endif %}\n",
    "        {%- if loop.index0 > ns.last_query_index %}\n",
    "            {%- if loop.last or (not loop.last and reasoning_content) %}\n",
    "                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}\n",
    "            {%- else %}\n",
    "                {{- '<|im_start|>' + message.role + '\\n' + content }}\n",
    "            {%- endif %}\n",
    "        {%- else %}\n",
    "            {{- '<|im_start|>' + message.role + '\\n' + content }}\n",
    "        {%- endif %}\n",
    "        {%- if message.tool_calls %}\n",
    "            {%- for tool_call in message.tool_calls %}\n",
    "                {%- if (loop.first and content) or (not loop.first) %}\n",
    "                    {{- '\\n' }}\n",
    "                {%- endif %}\n",
    "                {%- if tool_call.function %}\n",
    "                    {%- set tool_call = tool_call.function %}\n",
    "                {%- endif %}\n",
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n",
    "                {{- tool_call.name }}\n",
    "                {{- '\", \"arguments\": ' }}\n",
    "                {%- if tool_call.arguments is string %}\n",
    "                    {{- tool_call.arguments }}\n",
    "                {%- else %}\n",
    "                    {{- tool_call.arguments | tojson }}\n",
    "                {%- endif %}\n",
    "                {{- '}\\n</tool_call>' }}\n",
    "            {%- endfor %}\n",
    "        {%- endif %}\n",
    "        {{- '<|im_end|>\\n' }}\n",
    "    {%- elif message.role == \"tool\" %}\n",
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n",
    "            {{- '<|im_start|>user' }}\n",
    "        {%- endif %}\n",
    "        {{- '\\n<tool_response>\\n' }}\n",
    "        {{- message.content }}\n",
    "        {{- '\\n</tool_response>' }}\n",
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n",
    "            {{- '<|im_end|>\\n' }}\n",
    "        {%- endif %}\n",
    "    {%- endif %}\n",
    "{%- endfor %}\n",
    "{%- if add_generation_prompt %}\n",
    "    {{- '<|im_start|>assistant\\n' }}\n",
    "    {%- if enable_thinking is defined and enable_thinking is false %}\n",
    "        {{- '<think>\\n\\n</think>\\n\\n' }}\n",
    "    {%- endif %}\n",
    "{%- endif %}",
    NULL};

/* One piece per line: ISO C caps a string literal at 4095 bytes. */
char *moe_gen_chat_template(moe_arch arch)
{
    const char *const *pieces = arch == MOE_ARCH_MIXTRAL     ? MIXTRAL
                                : arch == MOE_ARCH_QWEN2_MOE ? QWEN2_MOE
                                : arch == MOE_ARCH_OLMOE     ? OLMOE
                                : arch == MOE_ARCH_QWEN3_MOE ? QWEN3_MOE
                                                             : NULL;
    if (!pieces)
        return NULL;
    size_t n = 0;
    for (int i = 0; pieces[i]; i++)
        n += strlen(pieces[i]);
    char *s = malloc(n + 1);
    if (!s)
        return NULL;
    size_t o = 0;
    for (int i = 0; pieces[i]; i++) {
        size_t k = strlen(pieces[i]);
        memcpy(s + o, pieces[i], k);
        o += k;
    }
    s[o] = '\0';
    return s;
}
